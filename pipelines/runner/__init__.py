"""Runner glue: Beam pipelines and counters (`beam`), the runner a build runs on and the Dask
cluster it may start (`session`), and Beam's DaskRunner with its gaps fixed (`dask_runner`)."""
