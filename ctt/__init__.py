"""ctt: learn a continue-thinking token by RL with budget forcing in the loop.

`from ctt import ContinueThinking` is the Python API (ctt/api.py); imported on first use, so `import ctt` stays light.
"""


def __getattr__(name: str):
    if name in ("ContinueThinking", "Completion"):
        from ctt import api

        return getattr(api, name)
    raise AttributeError(f"module 'ctt' has no attribute {name!r}")
