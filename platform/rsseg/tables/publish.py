"""The tables back into MLflow: every table and figure `platform tables` writes is logged to a
``tables`` run in each experiment whose runs fill it (one run per experiment, re-used by the next
`platform tables`), its Markdown shown as the run's description, and the experiment's sweep
parent runs point at it (tag ``tables_run_id``)."""

from __future__ import annotations

from rsseg import tracking

MAX_NOTE = 7_500  # MLflow's tag values hold 8 000 characters


def publish(uri: str, report) -> dict[str, str]:
    """experiment name -> the run id of its tables run, for the experiments with runs in a table."""
    from rsseg.provenance import stamp

    by_experiment: dict[str, list[str]] = {}
    for tid, built in report.built.items():
        for name in built.experiments:
            by_experiment.setdefault(name, []).append(tid)
    if not by_experiment:  # nothing built from runs: reading the store never creates one
        return {}
    c = tracking.client(uri)
    out = {}
    for name, tids in sorted(by_experiment.items()):
        exp_id = tracking.experiment_id(uri, name)
        previous = c.search_runs([exp_id], filter_string="tags.kind = 'tables'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
        run = tracking.start_run(uri, name, "tables", tags={"kind": "tables"},
                                 reopen=previous[0].info.run_id if previous else None)
        with tracking.tracked(run):
            for path in report.files:
                if path.name.split(".")[0] in tids:
                    run.log_artifact(path, "tables")
            note = "\n\n".join(report.markdown[t] for t in tids)
            run.set_tags({"tables": ",".join(tids), **{f"rsseg.{k}": str(v) for k, v in stamp().items()},
                          "mlflow.note.content": note if len(note) <= MAX_NOTE else note[:MAX_NOTE] + "\n\n(cut: see the tables/ artifacts)"})
        for parent in c.search_runs([exp_id], filter_string="tags.kind = 'sweep'", max_results=1000):
            c.set_tag(parent.info.run_id, "tables_run_id", run.run_id)
        out[name] = run.run_id
    return out
