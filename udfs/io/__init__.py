"""Reading and writing: the storage layer, the warehouse without Spark, image files and bytes."""
