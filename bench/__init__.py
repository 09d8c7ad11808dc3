"""MKA Studio's benchmarks: `make bench` (= `python -m bench.run`) measures compression quality of
every method side by side, the cost of each analysis stage and the app's responsiveness, writes the
numbers to bench/results/ and regenerates BENCHMARKS.md from them (`python -m bench.render`)."""
