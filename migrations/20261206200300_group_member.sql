-- Complete cohorts: the members of each group a job exports, as read from `GET Group/{id}` at
-- each group run. A member first seen by an incremental run gets their whole history in the
-- same run (a second export with `patient` and without `_since`: the Bulk Data Group
-- Membership Request Pattern). A member who left keeps their rows in the warehouse; `left_run`
-- records the run that first saw them gone. A member who comes back is new again.
CREATE TABLE fhir_sync.group_member (
    job            text   NOT NULL,
    group_id       text   NOT NULL,
    patient_id     text   NOT NULL,
    first_seen_run bigint NOT NULL,
    left_run       bigint,
    PRIMARY KEY (job, group_id, patient_id)
);

ALTER TABLE fhir_sync.run
    -- The run is in (or past) its second export, of the group's new members; the watermark
    -- still takes the first export's transactionTime.
    -- The first export is deleted on the server before the member export takes `status_url`.
    ADD COLUMN member_export boolean NOT NULL DEFAULT false;
