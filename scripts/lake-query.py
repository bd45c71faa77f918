"""A query over archiver's Delta table with the Python `deltalake` package and pyarrow: delivered
orders and revenue per delivery day (the last 7 days of the table), and what the table holds."""

import os
import sys

import pyarrow.compute as pc
from deltalake import DeltaTable


def main(uri):
    table = DeltaTable(uri)
    data = table.to_pyarrow_table(columns=["delivery_date", "montant_total", "anomalies"])
    per_day = data.group_by("delivery_date").aggregate([("montant_total", "count"), ("montant_total", "sum")])
    per_day = per_day.sort_by([("delivery_date", "descending")]).slice(0, 7).sort_by("delivery_date")
    print(f"{'delivery_date':<14} {'orders':>7} {'revenue':>10}")
    for day, orders, revenue in zip(
        per_day.column("delivery_date").to_pylist(),
        per_day.column("montant_total_count").to_pylist(),
        per_day.column("montant_total_sum").to_pylist(),
    ):
        print(f"{day.isoformat():<14} {orders:>7} {revenue or 0:>10.2f}")
    with_anomalies = pc.sum(pc.greater(pc.list_value_length(data.column("anomalies")), 0)).as_py() or 0
    files = len(table.file_uris())
    print(f"table version {table.version()}: {data.num_rows} orders ({with_anomalies} with anomalies) in {files} Parquet files")


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
