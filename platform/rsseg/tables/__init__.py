"""The paper's Tables 1-5 and Figures 9-10, regenerated from MLflow (``platform tables``)."""
