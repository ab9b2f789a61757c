-- 0003: what a file's tags say (read with mutagen by the engine), on its recording, and how the
-- tagged BPM and key compare with the measured ones, on the analysis (DJs want that list:
-- SELECT ... FROM analysis_results WHERE tag_bpm_check <> 'match' OR tag_key_check <> 'match').

ALTER TABLE recordings
    ADD COLUMN title        text,
    ADD COLUMN artist       text,
    ADD COLUMN album        text,
    ADD COLUMN track_number integer,
    ADD COLUMN year         integer,
    ADD COLUMN genre        text,
    ADD COLUMN isrc         text,
    ADD COLUMN codec        text,
    ADD COLUMN bitrate_kbps integer,
    ADD COLUMN tag_bpm      double precision,   -- the file's BPM tag (TBPM, tmpo, BPM)
    ADD COLUMN tag_key      text;               -- the file's key tag as written (TKEY, initialkey)

ALTER TABLE analysis_results
    ADD COLUMN tag_bpm_check text CHECK (tag_bpm_check IN ('match', 'double', 'half', 'other')),
    ADD COLUMN tag_key_check text
        CHECK (tag_key_check IN ('match', 'relative', 'parallel', 'fifth', 'other'));

CREATE INDEX analysis_results_tag_mismatch_idx ON analysis_results (finished_at)
    WHERE tag_bpm_check <> 'match' OR tag_key_check <> 'match';
