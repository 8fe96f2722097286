"""Reading a sweep back: its measured configurations and frontier (``frontier``), the report's
tables (``report``) and figures (``figures``), from MLflow. Running a sweep is ``sweeps``;
neither package imports the other."""
