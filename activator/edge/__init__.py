"""The request edge: the OpenAI-compatible proxy (`proxy`), request bodies (`body`) and
payloads (`payload`), header rules (`headers`), error responses (`responses`: the one
place a typed error becomes an envelope), credentials and status-page sessions
(`credentials`, `auth`, `sessions`), requests aiohttp cannot parse (`rejections`) and the
admin API (`admin`).

Layer 9: may import every layer up to activator.reload.
"""
