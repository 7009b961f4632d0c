"""Compared methods (Table 3) as rsseg method plugins, and the paper's published numbers."""
