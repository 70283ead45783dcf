-- reference/0002_resources: seed 004's uploaded resources and their search index.
--
-- A resource row is inserted together with its `resource.created` event (through the outbox, in
-- the same transaction); the side-effect handlers then fill in their own columns. Each writes
-- absolute values (`SET sha256 = ...`, never an increment), so a handler that runs twice after a
-- crash leaves the same row. A deleted resource keeps its row, marked `deleted_at`, so an event
-- handled after the deletion can tell "gone" from "not written yet" and stop instead of retrying.

CREATE TABLE IF NOT EXISTS resources (
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL,
    original_name text        NOT NULL,
    content_type  text        NOT NULL,
    -- Relative to the storage directory.
    file_path     text        NOT NULL,
    size_bytes    bigint      NOT NULL,
    tags          text[]      NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    -- The hasher's results.
    sha256        text,
    md5           text,
    hashed_at     timestamptz,
    -- The image handler's results (images only): size, a 64-bit dHash, the thumbnail's path
    -- (relative, like file_path), or why the image could not be decoded.
    width         integer,
    height        integer,
    phash         text,
    thumbnail     text,
    image_error   text,
    image_done_at timestamptz
);

-- The indexer's full-text document: names, content type, tags and, for text files, the first
-- bytes of the content. Kept apart from `resources` so the indexer owns it alone, and its
-- presence says "indexed".
CREATE TABLE IF NOT EXISTS resource_index (
    resource_id uuid        PRIMARY KEY REFERENCES resources (id) ON DELETE CASCADE,
    document    tsvector    NOT NULL,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS resource_index_document ON resource_index USING gin (document);
