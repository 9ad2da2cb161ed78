-- Analytics views (SQL-on-FHIR v2 ViewDefinitions as tables): the helper functions the compiled
-- queries call, and the state of every materialised view.

-- Raises `message`; returns its second argument's type so that it can stand in any CASE branch.
-- VOLATILE so that the planner never evaluates it ahead of the branch that calls it.
CREATE FUNCTION fhir_sync.sof_fail(message text, result anyelement) RETURNS anyelement
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = message, ERRCODE = 'data_exception';
END
$$;

-- A view-level `where` path's value: true for [true], false for empty or [false]; any other
-- value is an error (a where path must be boolean).
CREATE FUNCTION fhir_sync.sof_where(c jsonb, message text) RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
BEGIN
    IF c IS NULL OR c = '[]'::jsonb OR c = '[false]'::jsonb THEN
        RETURN false;
    END IF;
    IF c = '[true]'::jsonb THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION USING MESSAGE = message, ERRCODE = 'data_exception';
END
$$;

-- getReferenceKey([type]): the id of each Reference (or reference string) in `refs`, when it
-- points at `want_type` (any type when NULL); the same value getResourceKey() gives, the id.
CREATE FUNCTION fhir_sync.sof_reference_keys(refs jsonb, want_type text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_agg(to_jsonb(m[2]) ORDER BY e.i)
    FROM jsonb_array_elements(coalesce(refs, '[]'::jsonb)) WITH ORDINALITY AS e(v, i),
         LATERAL regexp_match(
             CASE jsonb_typeof(e.v) WHEN 'object' THEN e.v ->> 'reference'
                                    WHEN 'string' THEN e.v #>> '{}' END,
             '(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9.-]{1,64})(?:/_history/[^/]*)?$') AS m
    WHERE m IS NOT NULL AND (want_type IS NULL OR m[1] = want_type)
$$;

-- lowBoundary()/highBoundary() of one value: decimals by their written precision (1.0 →
-- 0.95/1.05), dates to the day, dateTimes to the millisecond with the widest time zones when
-- none is given, times to the millisecond. `kind` is what the compiler knows of the type
-- ('decimal', 'date', 'dateTime', 'time' or 'any'). NULL when the value has no boundary.
CREATE FUNCTION fhir_sync.sof_boundary_one(v jsonb, kind text, high boolean) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    t text;
    scale int;
    m text[];
    y int;
    mo int;
    d int;
    frac text;
    tz text;
BEGIN
    IF v IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) = 'number' THEN
        IF kind NOT IN ('decimal', 'any') THEN
            RETURN NULL;
        END IF;
        t := v #>> '{}';
        scale := CASE WHEN position('.' IN t) > 0 THEN length(t) - position('.' IN t) ELSE 0 END;
        RETURN to_jsonb(t::numeric + (CASE WHEN high THEN 1 ELSE -1 END) * 5 * power(10::numeric, -(scale + 1)));
    END IF;
    IF jsonb_typeof(v) <> 'string' THEN
        RETURN NULL;
    END IF;
    t := v #>> '{}';
    m := regexp_match(t, '^([0-9]{2})(?::([0-9]{2})(?::([0-9]{2})(?:\.([0-9]+))?)?)?$');
    IF m IS NOT NULL THEN
        IF kind NOT IN ('time', 'any') THEN
            RETURN NULL;
        END IF;
        frac := CASE WHEN high THEN rpad(coalesce(m[4], ''), 3, '9') ELSE rpad(coalesce(m[4], ''), 3, '0') END;
        RETURN to_jsonb(m[1] || ':' || coalesce(m[2], CASE WHEN high THEN '59' ELSE '00' END)
            || ':' || coalesce(m[3], CASE WHEN high THEN '59' ELSE '00' END) || '.' || left(frac, 3));
    END IF;
    m := regexp_match(t, '^([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})(?:T([0-9]{2})(?::([0-9]{2})(?::([0-9]{2})(?:\.([0-9]+))?)?)?)?)?)?(Z|[+-][0-9]{2}:[0-9]{2})?$');
    IF m IS NULL OR kind NOT IN ('date', 'dateTime', 'any') THEN
        RETURN NULL;
    END IF;
    y := m[1]::int;
    mo := coalesce(m[2]::int, CASE WHEN high THEN 12 ELSE 1 END);
    d := coalesce(m[3]::int, CASE WHEN high
        THEN extract(day FROM (make_date(y, mo, 1) + interval '1 month' - interval '1 day'))::int
        ELSE 1 END);
    IF kind = 'date' OR (kind = 'any' AND m[4] IS NULL) THEN
        RETURN to_jsonb(to_char(make_date(y, mo, d), 'YYYY-MM-DD'));
    END IF;
    frac := CASE WHEN high THEN rpad(coalesce(m[7], ''), 3, '9') ELSE rpad(coalesce(m[7], ''), 3, '0') END;
    tz := coalesce(m[8], CASE WHEN high THEN '-12:00' ELSE '+14:00' END);
    RETURN to_jsonb(to_char(make_date(y, mo, d), 'YYYY-MM-DD') || 'T'
        || coalesce(m[4], CASE WHEN high THEN '23' ELSE '00' END) || ':'
        || coalesce(m[5], CASE WHEN high THEN '59' ELSE '00' END) || ':'
        || coalesce(m[6], CASE WHEN high THEN '59' ELSE '00' END) || '.' || left(frac, 3) || tz);
END
$$;

-- The boundary of every item of a collection (NULL when none has one).
CREATE FUNCTION fhir_sync.sof_boundary(c jsonb, kind text, high boolean) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_agg(b ORDER BY e.i)
    FROM jsonb_array_elements(coalesce(c, '[]'::jsonb)) WITH ORDINALITY AS e(v, i),
         LATERAL fhir_sync.sof_boundary_one(e.v, kind, high) AS b
    WHERE b IS NOT NULL
$$;

-- One row per materialised view (`fhir-sync views apply`). `definition_hash` says which
-- definition the table holds; `pending_run_ids` are runs whose changes a refresh has begun but
-- not committed (a failed or killed refresh leaves them here, and the next refresh applies them).
CREATE TABLE fhir_sync.view_state (
    name              text        PRIMARY KEY,
    table_schema      text        NOT NULL,
    resource_type     text        NOT NULL,
    definition_hash   text        NOT NULL,
    status            text        NOT NULL DEFAULT 'building'
                      CHECK (status IN ('fresh', 'stale', 'building', 'error')),
    row_count         bigint      NOT NULL DEFAULT 0,
    last_run_id       bigint,
    pending_run_ids   bigint[]    NOT NULL DEFAULT '{}',
    built_at          timestamptz,
    refreshed_at      timestamptz,
    refresh_duration_ms bigint,
    error             text
);
