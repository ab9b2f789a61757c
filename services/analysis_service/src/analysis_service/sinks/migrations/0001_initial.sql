-- 0001: recordings, analysis results and their segment timelines.
--
-- Applied by analysis_service.sinks.postgres.PostgresSink.start() inside one transaction that holds
-- pg_advisory_xact_lock, and recorded in schema_migrations. Never edit an applied migration: add
-- 0002_*.sql instead.

-- One row per distinct audio content (the worker's content hash), whatever its path.
CREATE TABLE recordings (
    content_hash  text PRIMARY KEY CHECK (content_hash <> ''),
    path          text,                         -- last path this content was seen at
    duration_s    double precision CHECK (duration_s >= 0),
    format        text,                         -- container/codec, e.g. 'mp3', 'flac'
    sample_rate   integer CHECK (sample_rate > 0),   -- source sample rate (Hz)
    channels      integer CHECK (channels > 0),
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per request id (the idempotency key): a redelivered request updates its row.
CREATE TABLE analysis_results (
    request_id        text PRIMARY KEY CHECK (request_id <> ''),
    correlation_id    text,
    status            text NOT NULL CHECK (status IN ('completed', 'failed')),
    file              text,
    content_hash      text REFERENCES recordings (content_hash),
    error_code        text,
    error_message     text,
    bpm               double precision,
    bpm_confidence    double precision,
    key               text,                     -- e.g. 'A minor'
    key_tonic         text,                     -- e.g. 'A'
    key_mode          text CHECK (key_mode IN ('major', 'minor')),
    camelot           text,                     -- e.g. '8A'
    key_confidence    double precision,
    energy            double precision,
    valence           double precision,
    danceability      double precision,
    mood_label        text,
    mood_confidence   double precision,
    analyzer_versions jsonb,                    -- {"tempo": "1.0", ...}
    timings           jsonb,                    -- seconds per stage {"decode": 0.4, ...}
    output            jsonb,                    -- the full EngineOutput
    cached            boolean NOT NULL DEFAULT false,
    finished_at       timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX analysis_results_content_hash_idx ON analysis_results (content_hash);
CREATE INDEX analysis_results_correlation_id_idx ON analysis_results (correlation_id)
    WHERE correlation_id IS NOT NULL;
CREATE INDEX analysis_results_camelot_bpm_idx ON analysis_results (camelot, bpm)
    WHERE status = 'completed';
CREATE INDEX analysis_results_finished_at_idx ON analysis_results (finished_at);

-- The per-segment timeline of long files; replaced as a whole on every write of its request.
CREATE TABLE timeline_segments (
    request_id text NOT NULL REFERENCES analysis_results (request_id) ON DELETE CASCADE,
    idx        integer NOT NULL CHECK (idx >= 0),
    start_s    double precision NOT NULL CHECK (start_s >= 0),
    end_s      double precision NOT NULL,
    bpm        double precision,
    key        text,
    PRIMARY KEY (request_id, idx),
    CHECK (end_s >= start_s)
);
