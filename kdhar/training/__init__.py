"""One training run as small parts, wired by `kdhar.train.run_training`.

    prepare.prepare(...)  -> Prepared   data view, model, objective, init / resume checks, DDP
    loop.EpochLoop.run()  -> RunState   passes, optimisers, schedule; fires events to listeners
    listeners/            one small class per concern around the loop: scores, records,
                          checkpoints, the run's outcome (final metrics, logged model, registry)

Data flows one way: preparing knows nothing of the loop, the loop knows no listener by name, and a
listener reads the run and adds to it only through the event it is handed.
"""
