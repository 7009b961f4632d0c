"""The paper's published numbers as data (paper_tables.csv)."""
