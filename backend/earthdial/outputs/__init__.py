"""Result files: GeoPackage and GeoJSON written so that nothing a user had is lost, and preview pictures."""
