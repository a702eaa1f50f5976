"""The settings: the global ones and how they are read (:mod:`.config`), each model's
own (:mod:`.per_model`, resolved against the global ones by ``Settings.resolve``), the
holder a reload swaps (:mod:`.live`), keep-alive values (:mod:`.keep_alive`) and the
log threshold a reload sets (:mod:`.log_level`).

A leaf: nothing here imports the scheduler, the engine, the API or observability.
"""
