"""EarthDial's local backend: the model, the ZeroMQ server the QGIS plugin talks to, and the `earthdial` command.

Packages (docs/architecture.md follows one request through them): contract (the wire format and the
client, shared with the plugin), model (the checkpoint and its generation path), geo (rasters, bands,
boxes on the map), outputs (result files), scenes (whole scenes in tiles), serving (the server and what a
request does), install, demo, cli, and training (which nothing at run time imports)."""
