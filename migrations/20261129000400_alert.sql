-- Alerts sent to webhooks. A row is inserted before an alert is sent, and only the process
-- whose insert won sends it, so each alert goes out once however many processes see its cause;
-- the row then records how delivery went, for operators.
CREATE TABLE fhir_sync.alert_sent (
    id           bigserial   PRIMARY KEY,
    job          text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('run_failed', 'no_recent_success')),
    -- What makes an alert distinct within its kind: the failed run's id for 'run_failed'; for
    -- 'no_recent_success', the id of the job's last successful run (0 when it never had one),
    -- so a new success starts a new episode.
    episode      bigint      NOT NULL,
    -- scheme://host of the webhook; the rest of its URL is a secret.
    webhook_host text        NOT NULL,
    sent_at      timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    delivered_at timestamptz,
    -- Why the last attempt failed (a status code or a network error, never the URL).
    last_error   text,
    UNIQUE (job, kind, episode)
);
