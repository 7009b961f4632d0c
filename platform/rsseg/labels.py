"""Label conventions shared by the data layer, the heads and the metrics."""

# Pixels with this class index count nowhere: no information, clouds, GID's black, nodata.
IGNORE_INDEX = 255
