"""Geography: the window of a raster a request reads, its bands and presets, and the model's boxes as
polygons on the map."""
