"""A smallpond-style data layer: lazy DataFrames over parquet, run by DuckDB and pyarrow per partition.

`Session` (session.py) holds the data root and the executor (executors.py: a spawn process pool by
default, inline for debugging, Ray when given an address). A DataFrame (dataframe.py) is a plan
(plan.py) whose narrow steps become per-partition recipes (recipes.py) and whose repartitions
(partitioning.py) are stages of tasks (tasks.py) that exchange data as parquet files in storage.
"""

from storage.dataframe.dataframe import DataFrame
from storage.dataframe.executors import TaskError
from storage.dataframe.session import Session

__all__ = ["DataFrame", "Session", "TaskError"]
