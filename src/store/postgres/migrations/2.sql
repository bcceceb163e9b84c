-- Version 1 to 2: claims take the lanes that have waited longest first, so that a lane
-- handed back when its turn is over goes behind those that waited before it.
ALTER TABLE {s}.lanes ADD COLUMN waiting_since timestamptz;
UPDATE {s}.lanes SET waiting_since = now() WHERE pending > 0 AND owner IS NULL;
DROP INDEX {s}.lanes_free;
CREATE INDEX lanes_waiting ON {s}.lanes (handler, waiting_since)
    WHERE pending > 0 AND owner IS NULL;
