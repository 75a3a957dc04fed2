"""The load-test layer (`braintumor loadtest`): the locust runner, its stats and the soak's memory watch, plus the
locustfiles, payloads and shapes it runs and the benchmarks (``bench_*.py``). Nothing else imports it; the gateway
image does not ship it. Importing this package imports no locust (locust gevent-patches the importing process)."""
