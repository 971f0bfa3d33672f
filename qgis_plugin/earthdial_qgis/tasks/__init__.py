"""Work off the UI thread: QgsTasks that send a request or a scan and read its answers. They never touch a
widget; the GUI reacts to their signals on the main thread."""
