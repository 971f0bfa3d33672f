"""The contract between the backend and its clients: the wire format, the client and a result feature's
fields. These modules need only the standard library, numpy and pyzmq: the QGIS plugin runs copies of them."""
