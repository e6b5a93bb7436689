"""The stand-in engine (`fake_engine`, with vLLM's sleep mode in `sleepmode/`) that the
demo config, the sleep-mode example and the tests run in place of vLLM: product, not a
test double. `fake_engine` is the app, the process and the command line; its routes are
in `engine_routes`, what a request generates and how it is written out in `generation`,
the options, counters and error they share in `engine_options`. Also the poller tests
and benches share (`polling`).

Top layer: may import anything; nothing of activator imports it.
"""
