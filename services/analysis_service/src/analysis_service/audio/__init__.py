"""The analysis engine: decode a file once, compute shared features once, run the analyzers.

Nothing here knows about queues or databases; :func:`analysis_service.audio.engine.analyze_file`
is what both the local ``analyze`` command and the worker's process pool call.
"""
