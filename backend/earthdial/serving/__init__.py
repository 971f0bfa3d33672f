"""The server: admission of a request into typed values, a fair queue, reader processes for users' files,
and what each op does (service; scan for the streaming whole-scene ops), independent of the ZeroMQ socket
it arrived on."""
