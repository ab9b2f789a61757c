-- 0006: a terminal progress update Redis did not take is owed here, not only in the memory of the
-- worker that ended the request: any worker writes it once Redis answers (and clears the flag),
-- so a worker killed while Redis was down leaves no request shown "running" until it expires.

ALTER TABLE requests ADD COLUMN progress_owed boolean NOT NULL DEFAULT false;
CREATE INDEX requests_progress_owed_idx ON requests (request_id) WHERE progress_owed;
