"""The stand-in engine (`fake_engine`, with vLLM's sleep mode in `sleepmode/`) that the
demo config, the sleep-mode example and the tests run in place of vLLM: product, not a
test double. Also the poller tests and benches share (`polling`).

Top layer: may import anything; nothing of activator imports it.
"""
