-- A run whose export was incomplete (the server listed error files, a full export listed no
-- files at all, or the Patient count fell past the job's gate) ends 'partial': what it got is
-- loaded and the views refreshed, but the watermark stays where the last complete run left
-- it (unless the job sets `export.advance_watermark_on_partial`). `error` says why and `hint`
-- what to look at.
ALTER TABLE fhir_sync.run DROP CONSTRAINT run_status_check;
ALTER TABLE fhir_sync.run ADD CONSTRAINT run_status_check CHECK (status IN (
    'queued', 'kicking_off', 'exporting', 'loading', 'completing',
    'succeeded', 'partial', 'failed', 'cancelled', 'skipped'));
