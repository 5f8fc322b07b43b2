"""``ternlm serve``: an OpenAI-compatible server with continuous batching over the decode engine.

    ternlm serve runs/smol-ptb --slots 8 --ctx 1024          # then point any OpenAI client at it

``batch.BatchEngine``: slots decoding together; ``scheduler.Scheduler``: continuous batching;
``app``: the HTTP endpoints (``ServeConfig``, ``serve``, ``build_app``).
"""
