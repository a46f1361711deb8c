-- Statements every SQL interface must refuse (one per line): writes, settings, file access.
CREATE TABLE t AS SELECT 1
CREATE TABLE t (a INT)
CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc/'
CREATE EXTERNAL TABLE x (a INT) STORED AS CSV LOCATION '/etc/passwd'
CREATE VIEW v AS SELECT * FROM news
CREATE SCHEMA s
CREATE DATABASE d
CREATE FUNCTION f() RETURNS INT RETURN 1
DROP TABLE news
DROP VIEW v
DROP SCHEMA public
INSERT INTO news SELECT * FROM news
INSERT INTO windows VALUES (1)
UPDATE news SET headline = 'x'
DELETE FROM alerts
TRUNCATE TABLE news
COPY news TO '/tmp/bearwatch-leak.csv'
COPY (SELECT 1) TO '/tmp/bearwatch-leak.parquet' STORED AS PARQUET
SET datafusion.execution.batch_size = 1
SET TIME ZONE 'UTC'
PREPARE p AS SELECT 1
ALTER TABLE news RENAME TO old_news
SELECT * FROM read_parquet('/etc/passwd')
SELECT * FROM read_csv('/etc/passwd')
