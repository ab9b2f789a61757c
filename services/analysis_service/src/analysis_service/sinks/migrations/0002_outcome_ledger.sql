-- 0002: the outcome ledger. One row per request id, from submission (or first delivery) to its one
-- terminal outcome. See analysis_service.sinks.ledger for the transitions; the rules are:
--
--   * a row is created 'queued' (by the job API, at submission) or 'running' (by a worker, at the
--     first delivery of a request published straight to the broker);
--   * queued/running -> running: a delivery started (attempts + 1 on classic queues), unless another
--     worker holds the request: heartbeat_at is renewed every second by the worker running it, and
--     a start is refused while it is younger than the lease;
--   * queued/running -> completed | failed | cancelled: terminal, written once, in the same
--     transaction as the analysis_results row; a terminal row is never changed again (every write
--     is guarded by "status NOT IN terminal"), so a late or duplicate delivery cannot replace it;
--   * fingerprint identifies the request (file, analyses, options): a delivery that reuses a
--     request id for another request never touches this row.

CREATE TABLE requests (
    request_id          text PRIMARY KEY CHECK (request_id <> ''),
    fingerprint         text NOT NULL,
    file                text,
    analyses            text[],
    priority            smallint CHECK (priority BETWEEN 0 AND 9),
    options             jsonb,
    correlation_id      text,
    batch_id            text,
    status              text NOT NULL
                        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    error_code          text,
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    submitted_at        timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    heartbeat_at        timestamptz,
    finished_at         timestamptz,
    cancel_requested_at timestamptz,
    published_at        timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL))
);

CREATE INDEX requests_batch_idx ON requests (batch_id, request_id) WHERE batch_id IS NOT NULL;
CREATE INDEX requests_status_idx ON requests (status, submitted_at, request_id);
CREATE INDEX requests_submitted_idx ON requests (submitted_at, request_id);
CREATE INDEX requests_cancel_idx ON requests (request_id)
    WHERE cancel_requested_at IS NOT NULL AND status IN ('queued', 'running');

-- Terminal outcomes may now also be 'cancelled'; the full result message is kept so that a later
-- delivery re-publishes exactly what was announced.
ALTER TABLE analysis_results DROP CONSTRAINT analysis_results_status_check;
ALTER TABLE analysis_results ADD CONSTRAINT analysis_results_status_check
    CHECK (status IN ('completed', 'failed', 'cancelled'));
ALTER TABLE analysis_results ADD COLUMN result jsonb;

-- Results stored before the ledger existed become terminal ledger rows.
INSERT INTO requests (request_id, fingerprint, file, correlation_id, status, error_code,
                      submitted_at, started_at, finished_at, updated_at)
SELECT request_id, 'legacy', file, correlation_id, status, error_code,
       created_at, created_at, finished_at, updated_at
FROM analysis_results
ON CONFLICT (request_id) DO NOTHING;

ALTER TABLE analysis_results ADD CONSTRAINT analysis_results_request_fk
    FOREIGN KEY (request_id) REFERENCES requests (request_id);
