"""Training: fine-tune the backbone on catalogue labels, and retrain the search from shoppers' 👍/👎.

Both end the same way: a new model version under ``<data_dir>/models/<name>/``
(``weights.pth`` + ``weights.json`` when the backbone changed, ``index/``,
``metrics.json``), registered in the database, evaluated against the active version,
and activated only if it is not worse. One run at a time (:mod:`train.lock`); a run
that fails or is killed leaves the active version and its index untouched.

For the bot (``/retrain``) — the same code as ``python -m train feedback``::

    from train.feedback import FeedbackOptions, RetrainResult, retrain_from_feedback, retrain_from_feedback_async

    # inside the bot's event loop: DB calls on the loop, numpy/torch work in worker threads
    result = await retrain_from_feedback_async(db, settings.engine, progress=progress, activate=False)

    # or from a worker thread (opens its own Database on a fresh event loop)
    result = retrain_from_feedback(database_url, engine_settings, progress=progress)

    progress(fraction: float, text: str) -> None   # 0..1 and a line for people; called from any thread

    RetrainResult(              # = train.runs.TrainingResult, also returned by the fine-tuning
        status: str,            # "promoted" | "rejected" (trained, not better) | "insufficient" (too little feedback)
                                # | "unevaluated" (registered, not activated: no labelled photos to compare on, or the
                                #   version it was made from is no longer the active one: a rollback meanwhile stands)
        promoted: bool,         # status == "promoted": the new version should answer from now on
        version: str | None,    # the registered model version's name (None when nothing was trained)
        metrics: dict,          # searches, likes, dislikes, pairs, holdout_pairwise_before/after,
                                # precision5_before/after (validation photos, when FFENGINE_EVAL_QUERIES is set), seconds
        reason: str,            # one sentence for the admin: why promoted / kept / stopped
        run_id: int | None,     # the training_runs row
    )

With ``activate=True`` (the default, what the CLI does) a promoted version is also made
the active one in the database; the bot passes ``activate=False`` and switches with its
``ModelSwitch.activate`` (which loads the version first, then activates it).
Errors are :class:`ffengine.errors.FFError` (``str()`` is for people):
:class:`train.errors.TrainingLocked` when another run holds the lock, :class:`train.errors.TrainingError`
for anything else that stops a run.

Command line: ``python -m train finetune|feedback|simulate|models|rollback`` (``ffengine-train``).
"""
