"""EarthDial's local backend: the model, the ZeroMQ server the QGIS plugin talks to, and the `earthdial` command.

Layers, lowest first (docs/architecture.md): contract (the wire format and the client, shared with the
plugin) - model (the checkpoint and its generation path) - geo (rasters, bands, boxes on the map) - outputs
(result files) - scenes (whole scenes in tiles) - serving (the server and what a request does) - cli."""
