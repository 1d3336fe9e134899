"""Work: analysis workers. A worker claims queued jobs from the database, decodes their images, has its
model process run them (:mod:`.inference`), builds the outputs (:mod:`node.outputs`) and records them with
the sends they need (:mod:`.results`)."""
