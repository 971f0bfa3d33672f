"""What the plugin knows without widgets: areas and sources of a request, result layers and their
GeoPackage, settings, history, the local backend process and the plugin's own dependencies."""
