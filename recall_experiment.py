"""The recall experiment: facts read with memory updates in one session, saved to a memory file, and asked
about in a new session (new model load, empty context) that loads the file; answer NLL and exact recall per
update rule.

    python recall_experiment.py --model-path DIR [--rules none,ema,surprise] [--repeats N] [--facts FILE.json]
                                [--output FILE.json]
"""

from titans_distil.recall import recall_experiment

if __name__ == "__main__":
    recall_experiment()
