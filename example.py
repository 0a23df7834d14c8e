"""The seed's Humpty Dumpty word count, in Python 3: `python example.py`.

With no discovery service configured, ec262 starts a local cluster (a
discovery service and 3 workers on this machine) for the length of the job.
"""

import ec262

data = [
    "Humpty Dumpty sat on a wall",
    "Humpty Dumpty had a great fall",
    "All the King's horses and all the King's men",
    "Couldn't put Humpty together again",
]
datasource = dict(enumerate(data))


@ec262.mapper
def mapfn(k, v):
    for w in v.split():
        yield w, 1


@ec262.reducer
def reducefn(k, vs):
    result = sum(vs)
    return result


results = ec262.run_job(datasource)
print(results)
