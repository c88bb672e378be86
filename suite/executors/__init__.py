"""Executors: how the runner's configs get run. Each is a function
`execute(configs, names, run_one, log) -> [Outcome per config, in order]`, where `run_one(cfg, names)` is the
runner's per-config function (runner.run_config with the run's folder and settings bound) and `names` the
per-config stages asked for. `local` runs them one after another in this process (the default); `ray` runs each
config's train -> prune -> export chain as a Ray task and the timing stages afterwards on the driver.
"""

EXECUTORS = ("local", "ray")
