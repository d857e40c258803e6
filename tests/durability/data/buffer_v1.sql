-- A buffer written by schema version 1 (the first release): frozen, never regenerate.
-- 12 scrap events of m1/m2 (sink 'central'): 3 delivered and deleted, 1 dead letter (422),
-- 2 leased at a crash (seq 5, 6), 6 pending; no clean stop recorded.
PRAGMA user_version = 1;
BEGIN TRANSACTION;
CREATE TABLE deliveries(
        sink         TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('pending', 'leased', 'dead')),
        seq          INTEGER NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        leased_until REAL,
        status       INTEGER,
        detail       TEXT,
        failed_at    TEXT,
        PRIMARY KEY (sink, state, seq)) WITHOUT ROWID;
INSERT INTO "deliveries" VALUES('central','dead',4,1,NULL,422,'refused by an old receiver','2026-11-28T10:05:03.235Z');
INSERT INTO "deliveries" VALUES('central','leased',5,0,123.0,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','leased',6,0,123.0,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','pending',7,0,NULL,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','pending',8,0,NULL,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','pending',9,0,NULL,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','pending',10,0,NULL,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','pending',11,0,NULL,NULL,NULL,NULL);
INSERT INTO "deliveries" VALUES('central','pending',12,0,NULL,NULL,NULL,NULL);
CREATE TABLE detector_state(
        key        TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE drops(
        type     TEXT PRIMARY KEY,
        count    INTEGER NOT NULL,
        first_at TEXT NOT NULL,
        last_at  TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE events(
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        key        TEXT NOT NULL,
        type       TEXT NOT NULL,
        time       TEXT NOT NULL,
        payload    TEXT NOT NULL,
        created_at TEXT NOT NULL);
INSERT INTO "events" VALUES(4,'00000000-0000-5000-8000-000000000004','m2','plantedge.scrap.recorded','2026-01-01T00:00:04.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000004","source":"/sites/s1/lines/l1/machines/m2","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:04.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"2","data":{"machine":"m2","line":"l1","site":"s1","quantity":4,"window_start":"2026-01-01T00:00:04.000Z","window_end":"2026-01-01T00:00:04.000Z","counter_from":0,"counter_to":4}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(5,'00000000-0000-5000-8000-000000000005','m1','plantedge.scrap.recorded','2026-01-01T00:00:05.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000005","source":"/sites/s1/lines/l1/machines/m1","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:05.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"3","data":{"machine":"m1","line":"l1","site":"s1","quantity":5,"window_start":"2026-01-01T00:00:05.000Z","window_end":"2026-01-01T00:00:05.000Z","counter_from":0,"counter_to":5}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(6,'00000000-0000-5000-8000-000000000006','m2','plantedge.scrap.recorded','2026-01-01T00:00:06.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000006","source":"/sites/s1/lines/l1/machines/m2","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:06.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"3","data":{"machine":"m2","line":"l1","site":"s1","quantity":6,"window_start":"2026-01-01T00:00:06.000Z","window_end":"2026-01-01T00:00:06.000Z","counter_from":0,"counter_to":6}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(7,'00000000-0000-5000-8000-000000000007','m1','plantedge.scrap.recorded','2026-01-01T00:00:07.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000007","source":"/sites/s1/lines/l1/machines/m1","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:07.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"4","data":{"machine":"m1","line":"l1","site":"s1","quantity":7,"window_start":"2026-01-01T00:00:07.000Z","window_end":"2026-01-01T00:00:07.000Z","counter_from":0,"counter_to":7}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(8,'00000000-0000-5000-8000-000000000008','m2','plantedge.scrap.recorded','2026-01-01T00:00:08.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000008","source":"/sites/s1/lines/l1/machines/m2","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:08.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"4","data":{"machine":"m2","line":"l1","site":"s1","quantity":8,"window_start":"2026-01-01T00:00:08.000Z","window_end":"2026-01-01T00:00:08.000Z","counter_from":0,"counter_to":8}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(9,'00000000-0000-5000-8000-000000000009','m1','plantedge.scrap.recorded','2026-01-01T00:00:09.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000009","source":"/sites/s1/lines/l1/machines/m1","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:09.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"5","data":{"machine":"m1","line":"l1","site":"s1","quantity":9,"window_start":"2026-01-01T00:00:09.000Z","window_end":"2026-01-01T00:00:09.000Z","counter_from":0,"counter_to":9}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(10,'00000000-0000-5000-8000-000000000010','m2','plantedge.scrap.recorded','2026-01-01T00:00:10.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000010","source":"/sites/s1/lines/l1/machines/m2","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:10.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"5","data":{"machine":"m2","line":"l1","site":"s1","quantity":10,"window_start":"2026-01-01T00:00:10.000Z","window_end":"2026-01-01T00:00:10.000Z","counter_from":0,"counter_to":10}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(11,'00000000-0000-5000-8000-000000000011','m1','plantedge.scrap.recorded','2026-01-01T00:00:11.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000011","source":"/sites/s1/lines/l1/machines/m1","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:11.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"6","data":{"machine":"m1","line":"l1","site":"s1","quantity":11,"window_start":"2026-01-01T00:00:11.000Z","window_end":"2026-01-01T00:00:11.000Z","counter_from":0,"counter_to":11}}','2026-11-28T10:05:03.215Z');
INSERT INTO "events" VALUES(12,'00000000-0000-5000-8000-000000000012','m2','plantedge.scrap.recorded','2026-01-01T00:00:12.000Z','{"specversion":"1.0","id":"00000000-0000-5000-8000-000000000012","source":"/sites/s1/lines/l1/machines/m2","type":"plantedge.scrap.recorded","time":"2026-01-01T00:00:12.000Z","datacontenttype":"application/json","agentid":"dur-edge","sequence":"6","data":{"machine":"m2","line":"l1","site":"s1","quantity":12,"window_start":"2026-01-01T00:00:12.000Z","window_end":"2026-01-01T00:00:12.000Z","counter_from":0,"counter_to":12}}','2026-11-28T10:05:03.215Z');
CREATE TABLE meta(
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO "meta" VALUES('clean_stop',0);
INSERT INTO "meta" VALUES('dropped_total',0);
CREATE TABLE sinks(
        name     TEXT PRIMARY KEY,
        added_at TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO "sinks" VALUES('central','2026-11-28T10:05:03.211Z');
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('events',12);
COMMIT;
