"""vLLM's sleep mode for the stand-in engines: one state machine, its HTTP routes and reports.

Both stand-ins use it: the CPU one (activator.testing.fake_engine, memory simulated) and
the GPU one of the benchmark (bench/gpu_engine.py, real copies). An engine supplies a
`SleepDevice` that carries out the memory effects; everything an engine's client can see
(routes, status codes, bodies, what happens to requests) lives here, so both engines
answer alike. Checked against vLLM's own code; see docs/sleep-mode-engines.md for the
versions and files.

How vLLM behaves, and so how this behaves:
- The routes exist only with VLLM_SERVER_DEV_MODE=1 (404 otherwise). `--enable-sleep-mode`
  is what makes a sleep free memory: without it vLLM's routes still answer 200 and the
  engine pauses, but its allocations are outside the sleep allocator's pool and stay on
  the GPU (`pooled=False` here).
- `POST /sleep?level=0|1|2&mode=abort|wait|keep` pauses the scheduler first (abort: every
  request in the engine ends with finish_reason "abort"; wait: in-flight requests finish,
  new ones queue; keep: in-flight requests freeze until the wake), then sleeps the memory:
  level 1 copies the weights to host memory and drops the KV cache, level 2 drops both,
  level 0 only pauses. Sleeping again while the weights sleep changes nothing.
- `POST /wake_up[?tags=weights&tags=kv_cache]` maps the tags back (a level-2 weight tag
  comes back as garbage until `collective_rpc reload_weights`); a tag that is not asleep
  makes the whole call a no-op. Generation resumes only when every tag is awake.
- `GET /is_sleeping` is true while the scheduler is paused or any tag sleeps. Like every
  control call it is served after the one in progress (vLLM's engine core runs them one
  at a time), so it blocks during a slow sleep or wake.
- A request that arrives while the engine sleeps is parked, not refused: it hangs until a
  full wake (vLLM issue #45326). /health stays 200 throughout.

Modules: `state` (the pure transitions, table-tested), `controller` (the owner: control
calls, requests, the memory report), `routes` (vLLM's HTTP shapes), `report` (the
per-process memory file an outside observer reads).
"""

from activator.testing.sleepmode.controller import (
    SimulatedDevice,
    SleepConfig,
    SleepController,
    SleepDevice,
    Ticket,
)
from activator.testing.sleepmode.options import SleepOptions, add_arguments, take_options
from activator.testing.sleepmode.report import read_reports, report_path
from activator.testing.sleepmode.routes import CONTROLLER, add_sleep_routes
from activator.testing.sleepmode.state import Effect, Footprint, SleepState

__all__ = [
    "CONTROLLER",
    "Effect",
    "Footprint",
    "SimulatedDevice",
    "SleepConfig",
    "SleepController",
    "SleepDevice",
    "SleepOptions",
    "SleepState",
    "Ticket",
    "add_arguments",
    "add_sleep_routes",
    "read_reports",
    "report_path",
    "take_options",
]
