"""Reading a sweep back from MLflow: its measured configurations with their intervals
(``measured``), the frontier (``frontier``), the recommendation (``recommend``), the report's
tables (``report``) and figures (``figures``). Running a sweep is ``sweeps``; neither package
imports the other."""
