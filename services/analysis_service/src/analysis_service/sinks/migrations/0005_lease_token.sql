-- 0005: which delivery holds a request's lease. A start whose commit succeeded but whose reply was
-- lost (the connection dropped) is retried by the same delivery with the same token: it finds its
-- own lease and is neither counted again nor taken for a lease held by another worker.

ALTER TABLE requests ADD COLUMN lease_token text;
