"""Multi-run drivers: experiments made of several training runs, each an ordinary run of gancore.train.

    anomaly_table.py  one GANomaly run per normal digit -> the AUROC table (jobs/anomaly_table.py)
    reports.py        the reference reports' numbers and the settings each report preset must keep
"""
