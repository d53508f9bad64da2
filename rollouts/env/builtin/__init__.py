"""Built-in environments, named in rollouts/env/api.py's BUILTINS.

calculator.py        a calculator tool for multi-step arithmetic and GSM8K
calculator_agent.py  the same task as an application's OpenAI tool loop (agent.name: calculator,
                     named in rlhf/experience/agent_api.py's BUILTINS)"""
