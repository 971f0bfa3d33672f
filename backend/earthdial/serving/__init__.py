"""The server: admission of a request into typed values, budgets, a fair queue, reader processes for users'
files, and what each op does (service), independent of the ZeroMQ socket it arrived on."""
