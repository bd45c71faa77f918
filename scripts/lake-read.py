"""Reads a Delta table written by archiver with the `deltalake` Python package (an
implementation independent of archiver's) and prints what the tests check, as JSON: the table
version, the data files it references, the row count, the distinct order ids, each column's Arrow type, the partition columns,
and the rows by order id (the scalar columns, and the reference names)."""

import json
import os
import sys

from deltalake import DeltaTable


def storage_options(uri):
    """For an s3:// table, the standard AWS variables archiver read (an S3-compatible server's
    endpoint included)."""
    if not uri.startswith("s3"):
        return None
    keys = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP"]
    return {key: os.environ[key] for key in keys if key in os.environ}


def main(uri):
    table = DeltaTable(uri, storage_options=storage_options(uri))
    data = table.to_pyarrow_table()
    ids = data.column("_id").to_pylist()
    rows = {}
    for row in data.to_pylist():
        rows[row["_id"]] = {
            "numero_commande": row["numero_commande"],
            "montant_total": row["montant_total"],
            "date_livraison": row["date_livraison"].isoformat() if row["date_livraison"] else None,
            "delivery_date": row["delivery_date"].isoformat(),
            "client_nom": (row["client"] or {}).get("nom"),
            "items": len(row["items"] or []),
            "anomalies": row["anomalies"],
            "document_has_id": '"_id"' in row["document"],
        }
    print(json.dumps({
        "version": table.version(),
        "files": len(table.file_uris()),
        "rows": data.num_rows,
        "distinct_ids": len(set(ids)),
        "types": {field.name: str(field.type) for field in data.schema},
        "partitions": table.metadata().partition_columns,
        "by_id": rows,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave at once: the package's background threads have been seen to abort the interpreter's
    # teardown ("terminate called without an active exception") after everything was printed.
    sys.stdout.flush()
    os._exit(0)
