"""EarthDial's local backend: the model, the ZeroMQ server the QGIS plugin talks to, and the `earthdial` command.

Its packages are layers, lowest first; a module imports only from its own and lower ones
(tests/backend/test_import_graph.py): contract (the wire format and the client, shared with the plugin) -
limits (budgets, cancellation) - model (the checkpoint and its generation path) - demo (synthetic scenes) -
geo (rasters, bands, tiling, boxes on the map) - outputs (result files) - scenes (the tile runner) -
serving (the server and its ops) - jobs (journalled scans, archives, Ray) - install - training - cli.
docs/architecture.md follows one request through them."""
