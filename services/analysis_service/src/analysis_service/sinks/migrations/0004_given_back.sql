-- 0004: how many of a request's starts have been given back so far, from the running total that a
-- copy requeued with a delay carries (header x-analysis-given-back). A start subtracts only what
-- the total adds to this column, so a copy the broker delivers again (it crashed a worker) is
-- counted like any other start instead of being given back again and again.

ALTER TABLE requests
    ADD COLUMN given_back integer NOT NULL DEFAULT 0 CHECK (given_back >= 0);
