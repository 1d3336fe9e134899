-- The schema that node/db.py at commit 0871801 (the release before migrations) made on SQLite with
-- Base.metadata.create_all: CreateTable/CreateIndex of its sorted_tables, compiled for the sqlite dialect
-- (git show 0871801:node/db.py > head_db.py; import it; str(CreateTable(t).compile(dialect=sqlite.dialect()))).
-- tests/node/test_migrations.py builds a pre-migration database from it and upgrades it.

CREATE TABLE associations (
	id INTEGER NOT NULL,
	calling_ae VARCHAR(64) NOT NULL,
	called_ae VARCHAR(64) NOT NULL,
	peer_host VARCHAR(255) NOT NULL,
	peer_port INTEGER NOT NULL,
	started_at DATETIME NOT NULL,
	ended_at DATETIME,
	status VARCHAR(16) NOT NULL,
	reason TEXT,
	n_received INTEGER NOT NULL,
	n_failed INTEGER NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_associations_status ON associations (status);

CREATE TABLE instances (
	id INTEGER NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	study_instance_uid VARCHAR(64) NOT NULL,
	series_instance_uid VARCHAR(64) NOT NULL,
	patient_id VARCHAR(64) NOT NULL,
	modality VARCHAR(16),
	transfer_syntax VARCHAR(64) NOT NULL,
	path TEXT NOT NULL,
	size_bytes INTEGER NOT NULL,
	association_id INTEGER,
	calling_ae VARCHAR(64) NOT NULL,
	received_at DATETIME NOT NULL,
	times_received INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (sop_instance_uid),
	FOREIGN KEY(association_id) REFERENCES associations (id)
);

CREATE INDEX ix_instances_study_instance_uid ON instances (study_instance_uid);

CREATE TABLE jobs (
	id INTEGER NOT NULL,
	instance_id INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	reason TEXT,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME,
	reply_ae VARCHAR(64) NOT NULL,
	consensus BOOLEAN,
	created_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	duration_ms FLOAT,
	PRIMARY KEY (id),
	UNIQUE (instance_id),
	FOREIGN KEY(instance_id) REFERENCES instances (id)
);

CREATE INDEX ix_jobs_status ON jobs (status);

CREATE TABLE outputs (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	kind VARCHAR(8) NOT NULL,
	model VARCHAR(64),
	sop_class_uid VARCHAR(64) NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	series_instance_uid VARCHAR(64) NOT NULL,
	path TEXT NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(job_id) REFERENCES jobs (id),
	UNIQUE (sop_instance_uid)
);

CREATE INDEX ix_outputs_job_id ON outputs (job_id);

CREATE TABLE results (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	model VARCHAR(64) NOT NULL,
	builder VARCHAR(64) NOT NULL,
	probability FLOAT NOT NULL,
	threshold FLOAT NOT NULL,
	positive BOOLEAN NOT NULL,
	cam_peak_row INTEGER NOT NULL,
	cam_peak_col INTEGER NOT NULL,
	checkpoint_sha256 VARCHAR(64) NOT NULL,
	ms FLOAT NOT NULL,
	created_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_results_job_model UNIQUE (job_id, model),
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);

CREATE INDEX ix_results_job_id ON results (job_id);

CREATE TABLE sends (
	id INTEGER NOT NULL,
	job_id INTEGER NOT NULL,
	destination VARCHAR(64) NOT NULL,
	ae_title VARCHAR(16) NOT NULL,
	host VARCHAR(255) NOT NULL,
	port INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME,
	last_error TEXT,
	created_at DATETIME NOT NULL,
	sent_at DATETIME,
	PRIMARY KEY (id),
	CONSTRAINT uq_sends_job_destination UNIQUE (job_id, destination),
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);

CREATE INDEX ix_sends_job_id ON sends (job_id);

CREATE INDEX ix_sends_status ON sends (status);

CREATE TABLE send_attempts (
	id INTEGER NOT NULL,
	send_id INTEGER NOT NULL,
	started_at DATETIME NOT NULL,
	finished_at DATETIME,
	outcome VARCHAR(16) NOT NULL,
	detail TEXT NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(send_id) REFERENCES sends (id)
);

CREATE INDEX ix_send_attempts_send_id ON send_attempts (send_id);
