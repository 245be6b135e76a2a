DROP TABLE affinity;
